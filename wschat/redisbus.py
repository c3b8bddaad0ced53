"""
One room across several daemons, through a Redis pub/sub channel (``--redis``).

:class:`RedisBus` publishes each message of this daemon's clients once, as an envelope
(:mod:`wschat.envelope`), to a channel shared by several daemons, and gives every envelope it
receives on that channel (its own included) to this daemon's room. Every client of every daemon
sees the same messages in the same order: the order in which Redis received them. While the
link to Redis is down a message is not sent: its sender gets a notice through
``origin.refused(reason)`` and :attr:`RedisBus.refused` counts it; the daemon reconnects with
backoff and resumes on its own. Malformed envelopes are logged and skipped.

What waits for Redis is bounded: PUBLISHes not yet answered (the backlog) are limited in
number and bytes, and a Redis that has left one unanswered for :data:`STALL_TIMEOUT` seconds
(stopped, swapping, partitioned away without a reset) is treated as unavailable until it
answers again; either way new messages are refused with a notice instead of piling up in
memory. The link counts as up only once Redis has answered a PING on both connections.

This module imports the Redis client (txredisapi) and MessagePack: the ``redis`` extra.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.application import service
from twisted.internet import defer, endpoints, error, task
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

#: Seconds the oldest unanswered command may wait before the link counts as stalled and new
#: messages are refused: longer than any pause of a healthy Redis (a snapshot's fork, a slow
#: command), short enough that a sender waiting for its echo hears why before wondering.
STALL_TIMEOUT = 2.0
#: PUBLISHes sent and not yet answered, at most. A healthy link has few in flight (one round
#: trip's worth: 20 at 20,000 messages/s and 1 ms); this leaves room for 5,000 clients
#: sending in the same instant. Each costs its envelope plus ~4 KiB (the Deferreds, the reply
#: timeout, the transport's buffer): a stall holds at most ~25 MiB of 1 KiB messages.
MAX_BACKLOG = 5_000
#: Envelope bytes sent and not yet answered, at most: 256 messages of the default 64 KiB
#: limit.
MAX_BACKLOG_BYTES = 16 * 1024 * 1024

#: Told to a sender whose message was refused because the link to Redis is down.
REFUSED_DOWN = "message not delivered: the room is unavailable (Redis link down); try again later"
#: Told to a sender whose message Redis took but relayed to no daemon at all.
REFUSED_NO_ROOM = "message not delivered: no daemon is listening on the room's channel"
#: Told to a sender whose message was in flight when the link to Redis broke.
REFUSED_LOST = "message may not have been delivered: the Redis link broke while sending it"
#: Told to a sender whose message was refused because Redis has stopped answering.
REFUSED_STALLED = (
    "message not delivered: the room is unavailable (Redis is not answering); try again later"
)
#: Told to a sender whose message was refused because too much is waiting for Redis already.
REFUSED_BACKLOG = (
    "message not delivered: the room is overloaded (too much waiting for Redis); try again later"
)


def _count(n: int, noun: str) -> str:
    """``1 message``, ``2 messages``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class _Waiting:
    """One command sent to Redis and not yet answered: when it was sent, and its size."""

    __slots__ = ("sentAt", "size", "answered")

    def __init__(self, sentAt: float, size: int) -> None:
        self.sentAt = sentAt
        self.size = size
        self.answered = False


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
    @ivar backlog: PUBLISHes sent and not yet answered (at most ``maxBacklog``).
    @ivar backlogBytes: their envelopes' bytes (at most ``maxBacklogBytes``).
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
        stallTimeout: float = STALL_TIMEOUT,
        maxBacklog: int = MAX_BACKLOG,
        maxBacklogBytes: int = MAX_BACKLOG_BYTES,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.room = room
        self.address = address
        self.channel = channel
        self.node = node or secrets.token_hex(4)
        self.replyTimeout = replyTimeout
        self.stallTimeout = stallTimeout
        self.maxBacklog = maxBacklog
        self.maxBacklogBytes = maxBacklogBytes
        self._heartbeat = task.LoopingCall(self._ping)
        self._heartbeat.clock = reactor
        self._heartbeatInterval = heartbeat
        self.published = 0
        self.refused = 0
        self.received = 0
        self.malformed = 0
        self.backlog = 0
        self.backlogBytes = 0
        # Unanswered PUBLISHes, oldest first (answered ones leave from the left), and PINGs.
        self._inFlight: deque[_Waiting] = deque()
        self._pings: set[_Waiting] = set()
        self._publisher: _PublisherProtocol | None = None
        self._subscriber: _SubscriberProtocol | None = None
        self._confirming: tuple[object, object] | None = None
        self._factories: list[_BusFactory] = []
        self._up = False
        self._everUp = False
        self._downSince: float = reactor.seconds()
        self._refusedBefore = 0
        self._refusalLogged = False
        self._stallLogged = False
        self._backlogFull = False
        self._refusedWhenFull = 0
        self._complained = False
        self._gaveUp = False

    @property
    def available(self) -> bool:
        """
        Whether a message published now reaches the room: both connections are up and Redis
        is answering.
        """
        return self._up and not self._stalled(self._reactor.seconds())

    def _stalled(self, now: float) -> bool:
        """Whether a command has waited for its answer longer than ``stallTimeout``."""
        oldest = now
        if self._inFlight:
            oldest = self._inFlight[0].sentAt
        for ping in self._pings:
            oldest = min(oldest, ping.sentAt)
        return now - oldest > self.stallTimeout

    def publish(self, message: Message, origin: Origin) -> None:
        publisher = self._publisher
        if not self._up or publisher is None:
            self._refuse(origin, REFUSED_DOWN)
            return
        now = self._reactor.seconds()
        if self._stalled(now):
            self._stall(now)
            self._refuse(origin, REFUSED_STALLED)
            return
        data = encodeEnvelope(Envelope(message, self.node, now))
        size = len(data)
        if self.backlog >= self.maxBacklog or self.backlogBytes + size > self.maxBacklogBytes:
            self._backlogIsFull()
            self.refused += 1
            origin.refused(REFUSED_BACKLOG)
            return
        try:
            sent = publisher.publish(self.channel, data)
        except txredisapi.ConnectionError:
            self._refuse(origin, REFUSED_DOWN)
            return
        self.published += 1
        waiting = _Waiting(now, size)
        self._inFlight.append(waiting)
        self.backlog += 1
        self.backlogBytes += size
        sent.addCallbacks(
            self._delivered,
            self._lost,
            callbackArgs=(origin, waiting),
            errbackArgs=(origin, waiting),
        )

    def _answered(self, waiting: _Waiting) -> None:
        waiting.answered = True
        self.backlog -= 1
        self.backlogBytes -= waiting.size
        inFlight = self._inFlight
        while inFlight and inFlight[0].answered:
            inFlight.popleft()
        if self._stallLogged:
            self._stallEnded()
        if self._backlogFull and self.backlog * 2 <= self.maxBacklog:
            if self.backlogBytes * 2 <= self.maxBacklogBytes:
                self._backlogFull = False
                self._log.info(
                    "The Redis backlog has drained ({count} refused meanwhile)",
                    count=_count(self.refused - self._refusedWhenFull, "message"),
                )

    def _backlogIsFull(self) -> None:
        if self._backlogFull:
            return
        # Logged once until it has drained to half: a flood would flood the log otherwise.
        self._backlogFull = True
        self._refusedWhenFull = self.refused
        self._log.warn(
            "The Redis backlog is full ({count}, {size} bytes waiting for Redis; at most "
            "{maxCount} and {maxSize} bytes); refusing messages with a notice to their sender",
            count=_count(self.backlog, "message"),
            size=self.backlogBytes,
            maxCount=self.maxBacklog,
            maxSize=self.maxBacklogBytes,
        )

    def _delivered(self, receivers: object, origin: Origin, waiting: _Waiting) -> None:
        self._answered(waiting)
        # PUBLISH answers how many subscribers got it; none means not even this daemon.
        if receivers == 0:
            self._refuse(origin, REFUSED_NO_ROOM)

    def _lost(self, reason: Failure, origin: Origin, waiting: _Waiting) -> None:
        self._answered(waiting)
        self._refuse(origin, REFUSED_LOST)

    def _stall(self, now: float) -> None:
        if self._stallLogged:
            return
        # Once per stall, counted from here: its end is logged with the refusals meanwhile.
        self._stallLogged = True
        self._refusalLogged = True
        self._refusedBefore = self.refused
        self._downSince = now
        self._log.warn(
            "Redis {redis} has not answered for over {timeout:g} s ({backlog} waiting); "
            "refusing messages with a notice to their sender until it answers",
            redis=self.address,
            timeout=self.stallTimeout,
            backlog=_count(self.backlog, "message"),
        )

    def _stallEnded(self) -> None:
        now = self._reactor.seconds()
        if self._stalled(now):
            return
        self._stallLogged = False
        self._refusalLogged = False
        self._log.info(
            "Redis {redis} answers again (stalled {stalled:.1f} s, {count} refused meanwhile)",
            redis=self.address,
            stalled=now - self._downSince,
            count=_count(self.refused - self._refusedBefore, "message"),
        )

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
            if why.check(error.ConnectionAborted):
                # Only a reply timeout aborts: say so rather than "aborted locally".
                self._linkChanged(f"Redis did not answer within {self.replyTimeout:g} s")
            else:
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

    def _probe(self, protocol: txredisapi.RedisProtocol) -> defer.Deferred[object]:
        """PING on ``protocol``; the PING counts as waiting (for the stall check) until answered."""
        waiting = _Waiting(self._reactor.seconds(), 0)
        self._pings.add(waiting)

        def answered(result: object) -> object:
            self._pings.discard(waiting)
            if self._stallLogged:
                self._stallEnded()
            return result

        return defer.maybeDeferred(protocol.ping).addBoth(answered)

    def _ping(self) -> None:
        # An unanswered PING times out (replyTimeout) and drops the connection; that is all.
        for protocol in (self._publisher, self._subscriber):
            if protocol is not None:
                self._probe(protocol).addErrback(lambda _: None)

    def _disconnect(self) -> defer.Deferred[None]:
        if self._heartbeat.running:
            self._heartbeat.stop()
        self._up = False
        self._publisher = self._subscriber = None
        self._confirming = None
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
        publisher, subscriber = self._publisher, self._subscriber
        if publisher is not None and subscriber is not None:
            if not self._up:
                self._confirm(publisher, subscriber)
        elif self._up:
            self._linkDown(why)

    def _confirm(self, publisher: _PublisherProtocol, subscriber: _SubscriberProtocol) -> None:
        """
        Mark the link up once Redis answers a PING on both connections: a connection the
        kernel accepted for a stopped or hung Redis is not a link.
        """
        pair = (publisher, subscriber)
        if self._confirming == pair:
            return
        self._confirming = pair

        def answered(_: object) -> None:
            if self._confirming == pair:
                self._confirming = None
            if (
                self.running
                and not self._up
                and self._publisher is publisher
                and self._subscriber is subscriber
            ):
                self._linkUp()

        def unanswered(_: Failure) -> None:
            # Timed out (the connection is dropped and reconnected) or lost: a new pair of
            # connections is confirmed anew.
            if self._confirming == pair:
                self._confirming = None

        defer.gatherResults(
            [self._probe(publisher), self._probe(subscriber)], consumeErrors=True
        ).addCallbacks(answered, unanswered)

    def _linkUp(self) -> None:
        self._up = True
        self._complained = False
        self._refusalLogged = False
        if not self._everUp:
            self._everUp = True
            self._log.info(
                "Redis link up: {redis}, channel {channel!r}, node {node}",
                redis=self.address,
                channel=self.channel,
                node=self.node,
            )
            return
        self._log.info(
            "Redis link up: {redis}, channel {channel!r}, node {node} (down {down:.1f} s, "
            "{count} refused meanwhile)",
            redis=self.address,
            channel=self.channel,
            node=self.node,
            down=self._reactor.seconds() - self._downSince,
            count=_count(self.refused - self._refusedBefore, "message"),
        )

    def _linkDown(self, why: str) -> None:
        self._up = False
        self._refusalLogged = False
        if self._stallLogged:
            # The stall ends in an outage: counted from the stall's start.
            self._stallLogged = False
        else:
            self._downSince = self._reactor.seconds()
            self._refusedBefore = self.refused
        self._log.warn(
            "Redis link lost ({why}); reconnecting with backoff. Clients stay connected; "
            "messages sent meanwhile are refused with a notice to their sender",
            why=why,
        )
